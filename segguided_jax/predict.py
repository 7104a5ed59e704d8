"""The predict command: BraTS label maps and attention maps predicted for new cases.

    python -m segguided_jax.predict --help

Everything it does is segguided_jax.inference.predict (its docstring has the flags and the outputs)."""
import sys

from segguided_jax.inference.predict import main

if __name__ == "__main__":
    sys.exit(main())
