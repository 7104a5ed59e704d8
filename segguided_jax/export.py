"""The export command: a trained model as one deployable file.

    python -m segguided_jax.export --help

Everything it does is segguided_jax.inference.export (its docstring has the flags and the outputs)."""
import sys

from segguided_jax.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
