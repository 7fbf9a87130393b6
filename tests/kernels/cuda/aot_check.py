"""Compile representative Triton kernels for sm_90 without a GPU (Triton's bundled ptxas);
prints one line per kernel: name, vectorized global loads. Run in a process WITHOUT
TRITON_INTERPRET (test_compiles.py does)."""

import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bnlab.kernels.cuda import triton_kernels as K

DIVISIBLE = {"C", "S"}  # as for C = 64, S = 56*56


def compile_sm90(fn, types: dict, constexprs: dict, warps: int = 8):
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and (sig[n].startswith("*") or n in DIVISIBLE)}  # fmt: skip
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def main() -> None:
    f = "*fp32"
    ints = dict(M="i32", C="i32", S="i32", sblocks="i32", tiles_per_chunk="i32", num_chunks="i32")  # fmt: skip
    floats = dict(eps_hi="fp32", eps_lo="fp32", mom_hi="fp32", mom_lo="fp32")
    ptrs = {n: f for fn in (K.sums_kernel, K.forward_apply_kernel, K.backward_apply_kernel)
            for n in fn.arg_names if n.endswith("_ptr")}  # fmt: skip
    types = {**ptrs, "x_ptr": "*bf16", "g_ptr": "*bf16", "y_ptr": "*bf16", "res_ptr": "*bf16",
             "out_ptr": "*bf16", "dx_ptr": "*bf16", "dres_ptr": "*bf16", "bad_ptr": "*u8",
             "counter_ptr": "*i32", **ints, **floats}  # fmt: skip
    common = dict(WIDE=False, ACC=tl.float32, BLOCK_R=64, BLOCK_W=64)
    jobs = {
        "sums_planes_fwd": (
            K.sums_kernel,
            {**types, "out2_ptr": "*u8"},
            dict(common, BACKWARD=False, RELU=False, ROWS=False, BLOCK_C=1, FIN_K=64),
        ),
        "sums_rows_bwd_relu": (
            K.sums_kernel,
            types,
            dict(common, BACKWARD=True, RELU=True, ROWS=True, BLOCK_C=64, FIN_K=64),
        ),
        "forward_rows_add_relu_raise": (
            K.forward_apply_kernel,
            types,
            dict(
                common,
                TRAINING=True,
                HAS_W=True,
                HAS_B=True,
                HAS_RES=True,
                RELU=True,
                POLICY=2,
                HAS_RM=True,
                HAS_RV=True,
                UPDATE=True,
                ROWS=True,
                BLOCK_C=64,
                UPD_BLOCK=1024,
            ),
        ),
        "backward_planes_relu": (
            K.backward_apply_kernel,
            types,
            dict(
                common,
                TRAINING=True,
                HAS_W=True,
                RELU=True,
                WANT_DX=True,
                WANT_DRES=True,
                ROWS=False,
                BLOCK_C=1,
            ),
        ),
    }
    for name in sys.argv[1:] or jobs:
        fn, t, ce = jobs[name]
        ptx = compile_sm90(fn, t, ce).asm["ptx"]
        print(name, len(re.findall(r"ld\.global(?:\.\w+)*\.v\d", ptx)), flush=True)


if __name__ == "__main__":
    main()
