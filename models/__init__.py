"""Reference models trained and shipped by this project (weights as safetensors, configs as JSON).

    flux-fmnist/   class-conditional rectified-flow FluxTransformer2DModel on Fashion-MNIST
    judge-fmnist/  the independent CNN judge used by ``adatsq eval`` (accuracy, FID features)
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
