"""Compile every Triton kernel for real NVIDIA targets, without a GPU, and report what came out.

The CPU tests run the kernels through the interpreter, which executes the Python body and so cannot
catch what the GPU compiler rejects (types, layouts, shared-memory overflow). This drives the real
compiler (Triton frontend -> TTIR -> TTGIR -> LLVM -> PTX -> cubin via the bundled ptxas) for each
kernel at its largest autotune tile and prints shared memory and tensor-core instruction counts.

    python -m kernels.compile_check [--arch 80 90] [--dtype bf16 fp32]

fp32 builds take minutes on a busy CPU (no tensor cores, large unrolled FMA code), bf16 seconds.
"""

from __future__ import annotations

import argparse
import os
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernels.compile_check compiles for a GPU: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_masked_lora as kernels  # noqa: E402

_SIZES = dict(N="i32", IN="i32", OUT="i32", R="i32", scale="fp32", p="fp32", seed="i32")


def _cases(ptr: str, precision: str) -> dict[str, tuple[dict[str, str], dict]]:
    """Per kernel: argument types and the constexprs of its largest tile (dropout and masks on)."""
    common = dict(R_PAD=16, PRECISION=precision, COMPUTE_F32=False)
    matmul = dict(common, DROPOUT=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_N=2)
    reduction = dict(common, HAS_MASK=True, BLOCK_T=64)
    return {
        "_forward_kernel": (
            {**dict.fromkeys(("x_ptr", "w_ptr", "a_ptr", "b_ptr", "y_ptr", "xa_ptr"), ptr), **_SIZES},
            matmul,
        ),
        "_dx_kernel": (
            {**dict.fromkeys(("dy_ptr", "w_ptr", "a_ptr", "b_ptr", "dx_ptr", "dyb_ptr"), ptr), **_SIZES},
            dict(matmul, STORE_DYB=True),
        ),
        "_grad_A_kernel": (
            dict(
                dyb_ptr=ptr,
                x_ptr=ptr,
                mask_ptr="*u8",
                out_ptr="*fp32",
                N="i32",
                IN="i32",
                R="i32",
                scale="fp32",
                p="fp32",
                seed="i32",
            ),
            dict(reduction, DROPOUT=True, BLOCK_N=128),
        ),
        "_grad_B_kernel": (
            dict(dy_ptr=ptr, xa_ptr=ptr, mask_ptr="*u8", out_ptr="*fp32", N="i32", OUT="i32", R="i32", scale="fp32"),
            dict(reduction, BLOCK_M=128),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities")
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    for arch in args.arch:
        for dtype in args.dtype:
            for name, (signature, constexprs) in _cases(f"*{dtype}", "ieee" if dtype == "fp32" else "tf32").items():
                fn = getattr(kernels, name).fn  # the jitted function under its autotuner
                source = ASTSource(
                    fn,
                    {**signature, **dict.fromkeys(constexprs, "constexpr")},
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                )
                start = time.perf_counter()
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                ptx = compiled.asm["ptx"]
                print(
                    f"sm_{arch} {dtype:4s} {name:16s} shared {compiled.metadata.shared:6d} B  "
                    f"mma {ptx.count('mma.sync'):4d}  wgmma {ptx.count('wgmma.mma_async'):3d}  "
                    f"{time.perf_counter() - start:6.1f} s"
                )


if __name__ == "__main__":
    main()
