"""The fused GroupNorm + affine + activation (+ Proxy Norm) op: the only code of the package
aware of the compiled library in `custom_ops/`.

Modules, each importing only modules above it in this list:

    abi        op names, activation ids and dtypes shared with the C++/CUDA code
    errors     BuildError
    settings   every TF_PROXYNORM_* setting of the build and cache, parsed once
    toolchain  the host C++ compiler and the common flags
    cuda       the GPU step of the build (nvcc, headers, architectures)
    cache      the per-user cache, read only: build key, stamp checks, failure records,
               what first use would do (`plan`), the `describe` dict of `info`
    build      the compiler driver (`python -m tf_proxynorm.build`); the loader imports it
               only to compile
    loader     the one lazy load per process and its single warning
    ops        the op wrapper, its gradient, and whether the fused op can run a call
    info       `python -m tf_proxynorm.info`

The rest of the package uses only the names exported here.
"""

from tf_proxynorm.fused.abi import (GRAD_OP_NAME, KERNEL_ACTIVATIONS, KERNEL_DTYPES,
                                    LEAKY_RELU_SLOPE, OP_NAME)
from tf_proxynorm.fused.errors import BuildError
from tf_proxynorm.fused.loader import (attempt_load, describe, fused_op_available,
                                       library_path, load_attempted, unavailable_reason)
from tf_proxynorm.fused.ops import (can_use_fused, fused_group_norm_act, in_save_context,
                                    in_xla_context, op_attrs, raw_ops, why_not_fused)
