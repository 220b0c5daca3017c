"""The fidelity card: does a sandbox model reproduce the effects this field reports on Stable Diffusion?"""
