"""Storage helpers of the data plane (below the migration layer, beside the channel)."""
