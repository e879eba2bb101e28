package main

import "os"

// Added by the sandbox beside solution.go and tests.go, whose func main() it renamed
// mcodeSandboxTestsMain (recipes.py). The completion marker named by $MCODE_SANDBOX_COMPLETION_FILE is
// created only when that returns (the tests ran to their end); an os.Exit(0) before that never comes
// back here, so the sandbox does not count it as a pass (data_tools/sandbox/completion.py).
func main() {
	// Read before the tests: the program may change its environment.
	marker := os.Getenv("MCODE_SANDBOX_COMPLETION_FILE")
	mcodeSandboxTestsMain()
	if marker != "" {
		if f, err := os.Create(marker); err == nil {
			f.Close()
		}
	}
}
