import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;

/**
 * Runs the main class named by the first argument and tells a failed test from a crash by the exit
 * status: an uncaught AssertionError (the assert statement with -ea, JUnit/AssertJ failures, which
 * extend it) exits with 117, any other uncaught throwable with 1, in any thread.
 */
public final class SandboxHarness {
    private static final int TEST_FAILED = 117;

    private SandboxHarness() {
    }

    public static void main(String[] args) throws Exception {
        Thread.setDefaultUncaughtExceptionHandler((thread, error) -> die(error));
        Method main = Class.forName(args[0]).getMethod("main", String[].class);
        main.setAccessible(true);
        try {
            main.invoke(null, (Object) new String[0]);
        } catch (InvocationTargetException e) {
            die(e.getCause());
        }
    }

    private static void die(Throwable error) {
        error.printStackTrace();
        System.out.flush();
        System.err.flush();
        Runtime.getRuntime().halt(error instanceof AssertionError ? TEST_FAILED : 1);
    }
}
