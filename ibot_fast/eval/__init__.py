"""Evaluation of pre-trained backbones: k-NN (knn.py) and linear probing (linear.py)."""
