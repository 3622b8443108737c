"""What the fake kernels of every op family share."""


def same_device_or_fail(family, *tensors):
    """The fake kernels refuse tensors on different devices, as the real kernels (and torch's meta
    functions) do, instead of allocating on the first one's device (None entries are absent optionals)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"bmkernels {family}: all tensors must be on one device; got {sorted(map(str, devices))}")
