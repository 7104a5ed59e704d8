"""The evaluate command: predicted label maps scored against references as BraTS does.

    python -m segguided_jax.evaluate --help

Everything it does is segguided_jax.evaluation.evaluate (its docstring has the flags and the outputs)."""
import sys

from segguided_jax.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
