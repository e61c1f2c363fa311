from pipeline.emulator.cli import emulator_command

emulator_command()
