"""tests/python/test_parity.py's cases on distinct simulated devices: every case parametrized over device lists
runs here on [0, 1], [0, 1, 2], [0, 1, 2, 3] and [2, 0, 1] (the module on device 2), against the unwrapped module
run chunk by chunk on the first device (torch.nn.DataParallel's semantics by hand; upstream's own DataParallel
runs on CUDA only)."""

import test_parity
from distinct import device_list_tests

globals().update(device_list_tests(test_parity))
