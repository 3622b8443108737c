"""Turning a torch.nn module into its bmkernels drop-in (and back) without copying weights."""

# Per-module hook tables carried over, so user hooks keep firing after a swap.
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def rebuild(module, cls, ctor_kwargs, *, drop_hook=None, **extra_kwargs):
    """A `cls` built with `ctor_kwargs` that holds `module`'s own parameters, buffers and submodules
    (the same objects: optimizers and weight tying keep working), its train/eval mode and its
    hooks (except `drop_hook`). Built on the meta device, so nothing is allocated or initialised twice."""
    new = cls(**ctor_kwargs, **extra_kwargs, device="meta")
    new._parameters.clear()
    new._buffers.clear()
    new._modules.clear()
    new._parameters.update(module._parameters)
    new._buffers.update(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules.update(module._modules)
    for table in _HOOK_TABLES:
        source = getattr(module, table, None)
        if source is None:
            continue
        target = getattr(new, table)
        for key, hook in source.items():
            if hook is not drop_hook:
                target[key] = hook
    new.train(module.training)
    return new
