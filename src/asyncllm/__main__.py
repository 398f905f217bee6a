"""``python -m asyncllm ...``: the same command line as the ``asyncllm`` script."""

from asyncllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
