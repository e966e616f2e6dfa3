"""One module per CLI subcommand; each holds only argument parsing and printing."""

from keffconvert.commands.check import check_command
from keffconvert.commands.convert import convert_command
from keffconvert.commands.export import export_command
from keffconvert.commands.heatmaps import heatmaps_command
from keffconvert.commands.report import report_command
from keffconvert.commands.sweep import sweep_command
from keffconvert.commands.train import train_command

COMMANDS = [convert_command, check_command, train_command, sweep_command, report_command, export_command,
            heatmaps_command]
