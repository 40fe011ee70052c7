"""Models: the offline CLIP tokenizer (``tokenizer``), the embedded tiny Stable Diffusion and
tiny CLIP (``tiny``, weights in ``tiny_sd/`` and ``tiny_clip/``), Stable Diffusion 1.5 and
CLIP ViT-L/14 shapes from ``engine/models/sd15`` on the meta device or with seeded random weights
(``shapes``: ``random:sd15``, ``random:clip-vit-l14``), pipeline loading with the project's
safetensors-only policy (``loading``), image/text encoders (``encoders``), and the pretraining
that made the tiny models (``pretrain``, run by jobs/pretrain_tiny.py)."""
