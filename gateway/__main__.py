"""`python -m blendgate.gateway`: the `blendgate` command (gateway/cli.py)."""

from blendgate.gateway.syspath import drop_working_directory

drop_working_directory()  # before anything imports transformers: see gateway/syspath.py

from blendgate.gateway.cli import main  # noqa: E402

main()
