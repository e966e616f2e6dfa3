"""One module per CLI subcommand; each holds only argument parsing and printing."""

from keffconvert.commands.convert import convert_command

COMMANDS = [convert_command]
