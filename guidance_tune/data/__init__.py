"""The data a run trains on: splits held on the device and batched there (:mod:`.splits`), the
dataset readers (:mod:`.readers`) and their file rules (:mod:`.files`), what each task reports
(:mod:`.tasks`), and the generated sequence tasks and text corpus (:mod:`.sequences`,
:mod:`.text`, :mod:`.corpus`)."""
