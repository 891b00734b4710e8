"""Black-box, source-free distillation of CGN mechanisms into TinyGAN-style students.

Source-free by construction: nothing here imports `skdcgn.data`, and the teacher is only ever
*called* (`mechanism(u, y)` under `no_grad`); its weights and gradients are never read.
"""
