"""The filter stage: caption rules, CLIP similarity, near-duplicates, and the guard on CLIP's rules."""
