"""Sessions, the micro-turn engine, the floor policy, backends and background jobs."""
