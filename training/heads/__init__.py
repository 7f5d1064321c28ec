"""Heads learned from human labels on top of the served networks: the 4Q set's quadrants and its
AllMusic mood words become calibrated probabilities in every record.

    data        the networks' per-patch outputs on the labelled clips, cached
    recipe      how a head is fitted, every choice inside the training data
    protocols   how it is measured: the papers' stratified protocol and an artist-disjoint one
    run         the commands (human-eval, heads) and the committed features (features/)
"""
