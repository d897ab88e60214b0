"""Engine-agnostic stage framework: stages yield rows or outcomes; runners only schedule."""
