"""Built-in studies, one TOML file each (`sensgen run NAME`)."""
