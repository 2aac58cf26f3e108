"""The skin-lesion case study, built offline: generated dermoscopy-like images with planted artifacts,
a tiny OpenCLIP model trained on them from scratch, and a probe trained on a biased split."""
