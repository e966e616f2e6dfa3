"""One module per CLI subcommand (`keffconvert.cli` registers them); each holds only argument
parsing and printing over the Python API."""
