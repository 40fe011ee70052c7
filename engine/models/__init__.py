"""Models: the offline CLIP tokenizer (``tokenizer``), the embedded tiny Stable Diffusion and
tiny CLIP (``tiny``, weights in ``tiny_sd/`` and ``tiny_clip/``), pipeline loading with the
project's safetensors-only policy (``loading``), and image/text encoders (``encoders``)."""
