"""Torch-free formats shared by export and runtime: the contract between the stages."""
