"""Data: reading label lists (`index`), split lists and their fingerprints (`splits`), views
(`views`), torch Datasets (`datasets`) and the demo dataset (`demo_data`). `datasets` alone needs torch."""
