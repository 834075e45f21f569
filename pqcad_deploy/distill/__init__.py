"""CAD: calibration-assisted distillation of the PQ student to half the DDIM steps (docs/ARCHITECTURE.md, The method).

``grid`` pairs the student's N/2-step grid with the teacher's N-step grid, ``target`` holds the DDIM
maths and the progressive-distillation x0 target, ``dc`` draws the C_DC calibration set and ``cad``
runs the quantization-aware distillation.
"""
