"""Datasets: image folders with manifests, insightface RecordIO."""
