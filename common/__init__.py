"""The ground floor: what every folder may import. It imports nothing of ours (standard library at
module level; heavy third-party packages only inside the functions that need them)."""
