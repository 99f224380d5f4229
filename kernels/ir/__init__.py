"""The schedule IR: operators as data, schedules as values, lowering to one loop IR."""
