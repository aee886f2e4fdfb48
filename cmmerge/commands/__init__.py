"""The commands of the command line: each reads its composed config once, through
:mod:`cmmerge.config`, into the typed job of its stage (:mod:`cmmerge.stages`), and runs it."""
