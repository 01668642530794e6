"""Host buffers and loads onto the compute device: on a CPU device every path is a plain copy."""
import torch

from hybrid.lanes import PinnedBuffer, load


def test_pinned_buffer_grows_and_its_device_rows_are_its_rows_without_cuda():
    b = PinnedBuffer(4, torch.float32, pin=False, alias=True)         # no CUDA: no alias, whatever is asked
    r = b.rows(3)
    r.copy_(torch.arange(12.0).view(3, 4))
    assert b.dev is None and b.device_rows(3).data_ptr() == r.data_ptr()
    assert b.rows(10).shape == (10, 4) and b.buf.shape[0] >= 10          # grows (contents not kept)
    v = PinnedBuffer(1, torch.int32, pin=False)
    t, arr = v.vector(5)
    arr[:] = [5, 4, 3, 2, 1]
    assert v.device_vector(5).tolist() == [5, 4, 3, 2, 1]


def test_load_copies_across_devices_and_runs_a_kernel_on_one():
    dst = torch.zeros(2, 3, dtype=torch.bfloat16)
    src = torch.randn(2, 3).bfloat16()
    load(dst, src)
    assert torch.equal(dst, src)
    idx = torch.zeros(4, dtype=torch.int32)
    load(idx, torch.tensor([3, 1, 2, 0], dtype=torch.int32))
    assert idx.tolist() == [3, 1, 2, 0]
