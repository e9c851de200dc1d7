"""Wan2.1 T2V-1.3B generation core: parameters, loading, text encoding, sampler, decode, MP4.

Plain PyTorch + diffusers + transformers; knows nothing of Ray or HTTP.
"""
