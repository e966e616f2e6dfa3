"""Importing keffconvert leaves the process alone; only the `keffconvert` command silences TensorFlow.

Each check runs in a fresh Python process: this one has imported Keras long ago.
"""

import os
import subprocess
import sys
import textwrap

import pytest


def python(code, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    return subprocess.run([sys.executable, *(["-c", textwrap.dedent(code)] if code else []), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_importing_and_using_keffconvert_never_redirects_stderr():
    # A finder that looks at fd 2 on every import (and writes to it as TensorFlow loads), while
    # keffconvert is imported and then loads Keras and TensorFlow on first use.
    result = python("""
        import importlib.abc, os, sys

        def identity():
            st = os.fstat(2)
            return st.st_dev, st.st_ino, st.st_mode

        seen = []

        class Probe(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                seen.append(identity())
                if name == "tensorflow":
                    os.write(2, b"probe: written to fd 2 while TensorFlow loads\\n")
                return None

        before = identity()
        sys.meta_path.insert(0, Probe())
        import keffconvert
        keffconvert.GroupedPointwiseConv2D  # loads Keras and its TensorFlow backend
        assert "tensorflow" in sys.modules
        print(len(seen), sorted(set(seen)) == [before])
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    imports, unchanged = result.stdout.split()
    assert int(imports) > 100 and unchanged == "True", result.stdout
    assert "probe: written to fd 2 while TensorFlow loads" in result.stderr


@pytest.mark.parametrize("first", ["keffconvert", "keras"])
def test_layers_are_registered_whichever_import_comes_first(first):
    second = "keras" if first == "keffconvert" else "keffconvert"
    result = python(f"""
        import {first}
        import {second}
        from keffconvert.converter import convert
        import keffconvert.train  # imports keffconvert.converter (where convert is defined) too

        for name in ("GroupedPointwiseConv2D", "InterleaveChannels"):
            assert keras.saving.get_registered_object("keffconvert>" + name) is getattr(keffconvert, name), name
        assert keffconvert.convert is convert, keffconvert.convert  # the function, not its module
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-3000:]


def test_importing_the_command_line_loads_neither_keras_nor_tensorflow():
    result = python("""
        import sys
        import keffconvert, keffconvert.cli
        print(sorted(name for name in ("keras", "tensorflow") if name in sys.modules))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_command_starts_without_tensorflow_chatter():
    result = python(None, "-m", "keffconvert.cli", "efficientnetb0", "--classes", "10", "--input-size", "32",
                    "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4,020,358 -> 639,702" in result.stdout
    assert result.stderr == ""
