"""Evaluation of pre-trained backbones: k-NN (knn.py)."""
