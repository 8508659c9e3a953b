from distgan.eval.cli import cli

cli()
