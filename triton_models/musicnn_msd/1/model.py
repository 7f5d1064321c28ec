# placeholder until the helper's file lands
