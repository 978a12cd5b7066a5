"""brainrecon: deep image reconstruction from fMRI (Shen, Horikawa, Majima & Kamitani 2019), and beyond."""
__version__ = "0.1.0"
