"""Studies: a grid of runs (arms x seeds [x sweep points]) and the statistics that compare them."""
