"""The method itself, in plain torch: settings, RoPE frames, the blockwise clustering scheme, index
upkeep as k-means tasks, and the reference of decode attention that every runtime and kernel is
tested against."""
