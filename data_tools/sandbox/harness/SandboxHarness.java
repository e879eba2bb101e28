import java.io.FileOutputStream;
import java.io.IOException;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;

/**
 * Runs the main class named by the first argument and tells a failed test from a crash by the exit
 * status: an uncaught AssertionError (the assert statement with -ea, JUnit/AssertJ failures, which
 * extend it) exits with 117, any other uncaught throwable with 1, in any thread.
 *
 * <p>When that main returns (the tests ran to their end), the completion marker named by
 * $MCODE_SANDBOX_COMPLETION_FILE is created; a System.exit(0) before that never comes back here, so
 * the sandbox does not count it as a pass (data_tools/sandbox/completion.py).
 */
public final class SandboxHarness {
    private static final int TEST_FAILED = 117;

    private SandboxHarness() {
    }

    public static void main(String[] args) throws Exception {
        Thread.setDefaultUncaughtExceptionHandler((thread, error) -> die(error));
        String marker = System.getenv("MCODE_SANDBOX_COMPLETION_FILE");
        Method main = Class.forName(args[0]).getMethod("main", String[].class);
        main.setAccessible(true);
        try {
            main.invoke(null, (Object) new String[0]);
        } catch (InvocationTargetException e) {
            die(e.getCause());
        }
        if (marker != null) {
            markCompleted(marker);
        }
    }

    private static void markCompleted(String marker) {
        try {
            new FileOutputStream(marker).close();
        } catch (IOException e) {
            // no marker, no pass: the sandbox then reports that the tests did not finish
        }
    }

    private static void die(Throwable error) {
        error.printStackTrace();
        System.out.flush();
        System.err.flush();
        Runtime.getRuntime().halt(error instanceof AssertionError ? TEST_FAILED : 1);
    }
}
