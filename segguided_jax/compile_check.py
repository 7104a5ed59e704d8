"""The compile_check command: the train and predict steps compiled for this machine's CPU devices, a
TPU slice (--topology, with libtpu) or NVIDIA GPUs (--gpu, with JAX's CUDA plugin), no accelerator
needed: memory, FLOPs, bytes and the compiler's cost model per chip.

    python -m segguided_jax.compile_check --config=configs/brats21.py --topology=v5e:2x2 [--max_batch]

Everything it does is segguided_jax.compilation.compile_check (its docstring has the details)."""
import sys

if __name__ == "__main__":
    if any(a == "--gpu" or a.startswith("--gpu=") for a in sys.argv):
        from segguided_jax.compilation import gpu_compile  # imports no JAX

        gpu_compile.prepare_gpu_environment()  # before JAX is imported: it locates ptxas at import
    from segguided_jax.compilation import compile_check

    compile_check.run(sys.argv)
