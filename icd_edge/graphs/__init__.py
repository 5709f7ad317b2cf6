"""The torch modules shared by the export (what it traces), the torch reference backend and the
compiled GPU path: graph wrappers with the bundle's I/O, Prompt-to-Prompt attention processors,
the TAESD decoder. Needs torch and diffusers; never imports the export stage."""
