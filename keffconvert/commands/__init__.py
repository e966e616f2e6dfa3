"""One module per CLI subcommand; each holds only argument parsing and printing."""

from keffconvert.commands.check import check_command
from keffconvert.commands.convert import convert_command
from keffconvert.commands.export import export_command
from keffconvert.commands.report import report_command
from keffconvert.commands.train import train_command

COMMANDS = [convert_command, check_command, train_command, report_command, export_command]
