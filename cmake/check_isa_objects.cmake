# Fails if an object compiled for a non-baseline ISA defines a weak symbol (W, V) or a unique
# global (u): the linker may pick such a copy for the portable code too, which would then run
# AVX2 instructions on a CPU without them. Run as: cmake -DNM=... -DOBJECTS="a.o;b.o" -P <this>
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} --defined-only -C ${object} OUTPUT_VARIABLE symbols
                  RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "nm failed on ${object}")
  endif()
  string(REGEX MATCHALL "[^\n]* [WVu] [^\n]*" shared "${symbols}")
  # DW.ref.* are exception-handling data references, not code: harmless to share.
  list(FILTER shared EXCLUDE REGEX " DW\\.ref\\.")
  if(shared)
    string(REPLACE ";" "\n  " shared "${shared}")
    message(FATAL_ERROR "onestep: ${object} defines symbols the linker may share with the "
                        "portable build:\n  ${shared}")
  endif()
endforeach()
