"""torch alone: the heap corruption behind scripts/repro_heap (oneDNN's 1x1 strided
backward-weights over an NHWC source with fewer input channels than its channel block,
uxlfoundation/oneDNN#6035). A 1-channel (3, 1, 28, 28) input with strides (784, 1, 28, 1)
(channels_last, the same memory as contiguous), a channels_last 1x1 weight, stride 2, two
threads: crashed 4 runs in 4 with torch 2.6.0, 2.13.0 and 2.14.1 (MALLOC_PERTURB_=165).
    MALLOC_PERTURB_=165 python scripts/repro_heap/min_conv.py
"""

import torch

torch.set_num_threads(2)
for _ in range(300):
    w = torch.randn(1, 1, 1, 1).to(memory_format=torch.channels_last).requires_grad_()
    x = torch.empty_strided((3, 1, 28, 28), (784, 1, 28, 1)).normal_()
    torch.nn.functional.conv2d(x, w, stride=2).sum().backward()
print("no crash")
