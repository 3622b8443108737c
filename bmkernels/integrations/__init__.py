"""Ways into models that do not use torch.nn.MultiheadAttention.

- bmkernels.integrations.sdpa: sdpa_mode(), which routes every F.scaled_dot_product_attention call
  in its scope to bmkernels (diffusers, timm, custom models, anything that calls SDPA itself).
- bmkernels.integrations.transformers: the "bmkernels" attention implementation of Hugging Face
  transformers (importing it registers it).
- bmkernels.integrations.timm: the drop-in for timm.layers.Attention that swap_modules uses.

transformers and timm are imported only by their own modules, never by `import bmkernels`.
"""
