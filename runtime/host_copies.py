"""Host tensors sent to the device without making the host wait for the device.

A blocking copy to CUDA (`tensor.to("cuda")`) waits until the device has finished all queued
work, so a training step that makes one in the middle leaves the GPU idle while the host
prepares what follows. A non-blocking copy from pinned memory is queued like a kernel; from
pageable memory CUDA may still wait, hence the pinning."""


def to_device_without_waiting(tensor, device):
    """`tensor` (on the host) on `device`; equal values, the copy queued on CUDA's current stream."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
