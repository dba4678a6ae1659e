// JDBC compatibility checks for pgwarden (pgjdbc, no build tool).
//
//   javac -cp /usr/share/java/postgresql.jar -d OUT Jdbc.java
//   java -cp OUT:/usr/share/java/postgresql.jar Jdbc \
//     'jdbc:postgresql://127.0.0.1:6432/shop?user=dev&sslmode=disable&prepareThreshold=1'
//
// Prints `ok: <check>` per passed check. The first failure prints
// `FAIL: <check>: <reason>` with a stack trace to stderr and exits 1.

import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Timestamp;
import java.sql.Types;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Objects;

public final class Jdbc {
    private static final String TABLE = "compat_jdbc";

    interface Check {
        void run(Connection conn) throws Exception;
    }

    private static final class CheckFailed extends Exception {
        private static final long serialVersionUID = 1L;

        CheckFailed(String message) {
            super(message);
        }
    }

    private static void expect(Object actual, Object expected, String what) throws CheckFailed {
        if (!Objects.deepEquals(actual, expected)) {
            throw new CheckFailed(what + ": expected " + show(expected) + ", got " + show(actual));
        }
    }

    private static String show(Object o) {
        if (o instanceof byte[]) {
            return "bytes" + Arrays.toString((byte[]) o);
        }
        return o == null ? "null" : "'" + o + "' (" + o.getClass().getSimpleName() + ")";
    }

    private static void setup(Connection conn) throws Exception {
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + TABLE);
            st.execute("CREATE TABLE " + TABLE + " (id int PRIMARY KEY, label text, amount numeric,"
                    + " payload bytea, at timestamptz)");
            st.execute("COMMENT ON TABLE " + TABLE + " IS 'pgwarden JDBC compat table'");
        }
    }

    private static void preparedReuse(Connection conn) throws Exception {
        // prepareThreshold=1 in the URL: server-side prepared from the first execution.
        String sql = "SELECT ?::int * 2 AS doubled, ?::text || '!' AS shout, ?::numeric AS n /* jdbc-reuse */";
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            for (int i = 0; i < 50; i++) {
                ps.setInt(1, i);
                ps.setString(2, "p" + i + " ünï'");
                ps.setBigDecimal(3, new BigDecimal(i).movePointLeft(2));
                try (ResultSet rs = ps.executeQuery()) {
                    if (!rs.next()) {
                        throw new CheckFailed("no row for execution " + i);
                    }
                    expect(rs.getInt("doubled"), i * 2, "doubled at " + i);
                    expect(rs.getString("shout"), "p" + i + " ünï'!", "shout at " + i);
                    expect(rs.getBigDecimal("n"), new BigDecimal(i).movePointLeft(2), "numeric at " + i);
                    expect(rs.next(), false, "single row at " + i);
                }
            }
        }
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT count(*) FROM pg_prepared_statements"
                        + " WHERE statement LIKE '%jdbc-reuse%' AND statement NOT LIKE '%pg_prepared%'")) {
            rs.next();
            expect(rs.getInt(1), 1, "server-side prepared statements for the reused query");
        }
    }

    private static void batchInsert(Connection conn) throws Exception {
        try (PreparedStatement ps = conn.prepareStatement(
                "INSERT INTO " + TABLE + " (id, label, amount) VALUES (?, ?, ?)")) {
            for (int i = 0; i < 1000; i++) {
                ps.setInt(1, 1000 + i);
                ps.setString(2, "batch " + i);
                ps.setBigDecimal(3, BigDecimal.valueOf(i, 1));
                ps.addBatch();
            }
            int[] counts = ps.executeBatch();
            expect(counts.length, 1000, "executeBatch result length");
            for (int c : counts) {
                if (c != 1 && c != Statement.SUCCESS_NO_INFO) {
                    throw new CheckFailed("unexpected batch update count " + c);
                }
            }
        }
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT count(*), sum(amount) FROM " + TABLE + " WHERE id >= 1000")) {
            rs.next();
            expect(rs.getLong(1), 1000L, "count after batch");
            expect(rs.getBigDecimal(2), BigDecimal.valueOf(999L * 1000 / 2, 1), "sum after batch");
        }
    }

    private static void typeRoundTrip(Connection conn) throws Exception {
        byte[] payload = new byte[300];
        for (int i = 0; i < payload.length; i++) {
            payload[i] = (byte) i;
        }
        BigDecimal amount = new BigDecimal("-12345678901234567890.123456789012345678");
        Timestamp at = Timestamp.from(Instant.parse("2024-02-29T23:59:58.123456Z"));
        try (PreparedStatement ps = conn.prepareStatement(
                "INSERT INTO " + TABLE + " (id, label, amount, payload, at) VALUES (?, ?, ?, ?, ?)")) {
            ps.setInt(1, 1);
            ps.setString(2, "it's \"quoted\" ✓ 漢字");
            ps.setBigDecimal(3, amount);
            ps.setBytes(4, payload);
            ps.setTimestamp(5, at);
            expect(ps.executeUpdate(), 1, "insert count");
            ps.setInt(1, 2);
            ps.setNull(2, Types.VARCHAR);
            ps.setNull(3, Types.NUMERIC);
            ps.setNull(4, Types.BINARY);
            ps.setNull(5, Types.TIMESTAMP_WITH_TIMEZONE);
            expect(ps.executeUpdate(), 1, "insert NULLs count");
        }
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT label, amount, payload, at FROM " + TABLE + " WHERE id = ?")) {
            // Run it more than once so the second execution uses the server-side statement
            // (and pgjdbc asks for binary results of the types it knows).
            for (int round = 0; round < 3; round++) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    expect(rs.next(), true, "row present");
                    expect(rs.getString(1), "it's \"quoted\" ✓ 漢字", "text");
                    expect(rs.getBigDecimal(2), amount, "numeric");
                    expect(rs.getBytes(3), payload, "bytea");
                    expect(rs.getTimestamp(4), at, "timestamptz as Timestamp");
                    expect(rs.getObject(4, OffsetDateTime.class).withOffsetSameInstant(ZoneOffset.UTC),
                            OffsetDateTime.parse("2024-02-29T23:59:58.123456Z"), "timestamptz as OffsetDateTime");
                }
                ps.setInt(1, 2);
                try (ResultSet rs = ps.executeQuery()) {
                    expect(rs.next(), true, "NULL row present");
                    expect(rs.getString(1), null, "NULL text");
                    expect(rs.getBigDecimal(2), null, "NULL numeric");
                    expect(rs.getBytes(3), null, "NULL bytea");
                    expect(rs.getTimestamp(4), null, "NULL timestamptz");
                }
            }
        }
    }

    private static int count(Connection conn, String where) throws SQLException {
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT count(*) FROM " + TABLE + " WHERE " + where)) {
            rs.next();
            return rs.getInt(1);
        }
    }

    private static void transactions(Connection conn) throws Exception {
        conn.setAutoCommit(false);
        try {
            try (PreparedStatement ps = conn.prepareStatement("INSERT INTO " + TABLE + " (id, label) VALUES (?, ?)")) {
                ps.setInt(1, 10);
                ps.setString(2, "committed");
                ps.executeUpdate();
                conn.commit();
                ps.setInt(1, 11);
                ps.setString(2, "rolled back");
                ps.executeUpdate();
                expect(count(conn, "id = 11"), 1, "row visible inside the transaction");
                conn.rollback();
            }
            expect(count(conn, "id = 10"), 1, "committed row");
            expect(count(conn, "id = 11"), 0, "rolled-back row");
            // Savepoint inside a transaction.
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("INSERT INTO " + TABLE + " (id, label) VALUES (12, 'kept')");
                java.sql.Savepoint sp = conn.setSavepoint("sp1");
                st.executeUpdate("INSERT INTO " + TABLE + " (id, label) VALUES (13, 'undone')");
                conn.rollback(sp);
                conn.commit();
            }
            expect(count(conn, "id IN (12, 13)"), 1, "savepoint rollback");
            conn.commit();
        } finally {
            conn.setAutoCommit(true);
        }
    }

    private static void errorThenReuse(Connection conn) throws Exception {
        try (Statement st = conn.createStatement()) {
            st.executeQuery("SELECT * FROM compat_jdbc_no_such_table");
            throw new CheckFailed("query on a missing table succeeded");
        } catch (SQLException e) {
            expect(e.getSQLState(), "42P01", "SQLSTATE of missing table");
        }
        try (PreparedStatement ps = conn.prepareStatement("SELECT 1 / ?::int")) {
            ps.setInt(1, 0);
            ps.executeQuery();
            throw new CheckFailed("division by zero succeeded");
        } catch (SQLException e) {
            expect(e.getSQLState(), "22012", "SQLSTATE of division by zero");
        }
        // Inside a transaction: the error aborts it, rollback makes the connection usable.
        conn.setAutoCommit(false);
        try (Statement st = conn.createStatement()) {
            try {
                st.executeUpdate("INSERT INTO " + TABLE + " (id, label) VALUES (10, 'duplicate')");
                throw new CheckFailed("duplicate key accepted");
            } catch (SQLException e) {
                expect(e.getSQLState(), "23505", "SQLSTATE of unique violation");
            }
            try {
                st.executeQuery("SELECT 1");
                throw new CheckFailed("statement in an aborted transaction succeeded");
            } catch (SQLException e) {
                expect(e.getSQLState(), "25P02", "SQLSTATE in failed transaction");
            }
            conn.rollback();
        } finally {
            conn.setAutoCommit(true);
        }
        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::text")) {
            ps.setString(1, "alive");
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                expect(rs.getString(1), "alive", "query after errors");
            }
        }
    }

    private static void metadata(Connection conn) throws Exception {
        DatabaseMetaData md = conn.getMetaData();
        if (md.getDatabaseMajorVersion() < 12) {
            throw new CheckFailed("unexpected server major version " + md.getDatabaseMajorVersion());
        }
        List<String> found = new ArrayList<>();
        String remarks = null;
        try (ResultSet rs = md.getTables(null, "public", "compat_%", new String[] {"TABLE"})) {
            while (rs.next()) {
                found.add(rs.getString("TABLE_NAME"));
                if (TABLE.equals(rs.getString("TABLE_NAME"))) {
                    remarks = rs.getString("REMARKS");
                }
            }
        }
        if (!found.contains(TABLE)) {
            throw new CheckFailed("getTables did not list " + TABLE + ": " + found);
        }
        expect(remarks, "pgwarden JDBC compat table", "table remarks");
        List<String> columns = new ArrayList<>();
        try (ResultSet rs = md.getColumns(null, "public", TABLE, "%")) {
            while (rs.next()) {
                columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getString("TYPE_NAME"));
            }
        }
        expect(columns, List.of("id:int4", "label:text", "amount:numeric", "payload:bytea", "at:timestamptz"),
                "getColumns");
        List<String> pk = new ArrayList<>();
        try (ResultSet rs = md.getPrimaryKeys(null, "public", TABLE)) {
            while (rs.next()) {
                pk.add(rs.getString("COLUMN_NAME"));
            }
        }
        expect(pk, List.of("id"), "getPrimaryKeys");
        int schemas = 0;
        try (ResultSet rs = md.getSchemas()) {
            while (rs.next()) {
                schemas++;
            }
        }
        if (schemas < 2) {
            throw new CheckFailed("getSchemas returned " + schemas + " schemas");
        }
        try (PreparedStatement ps = conn.prepareStatement("SELECT id, label FROM " + TABLE + " WHERE id = ?")) {
            java.sql.ResultSetMetaData rsmd = ps.getMetaData();
            expect(rsmd.getColumnCount(), 2, "ResultSetMetaData column count");
            expect(rsmd.getColumnName(2), "label", "ResultSetMetaData column name");
            expect(rsmd.getTableName(2), TABLE, "ResultSetMetaData table name");
            expect(ps.getParameterMetaData().getParameterTypeName(1), "int4", "ParameterMetaData type");
        }
    }

    private static void streamingCursor(Connection conn) throws Exception {
        conn.setAutoCommit(false);
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT g, md5(g::text) FROM generate_series(1, ?) g")) {
            ps.setFetchSize(1000);
            ps.setInt(1, 100_000);
            long rows = 0;
            long sum = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    rows++;
                    sum += rs.getLong(1);
                    if (rs.getString(2).length() != 32) {
                        throw new CheckFailed("bad md5 at row " + rows);
                    }
                }
            }
            expect(rows, 100_000L, "streamed row count");
            expect(sum, 100_000L * 100_001 / 2, "streamed sum");
            conn.commit();
        } finally {
            conn.setAutoCommit(true);
        }
    }

    private static void cleanup(Connection conn) throws Exception {
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE " + TABLE);
        }
    }

    public static void main(String[] args) {
        if (args.length != 1) {
            System.err.println("usage: java Jdbc <jdbc-url>");
            System.exit(2);
        }
        String url = args[0];
        String[] names = {
            "setup table",
            "PreparedStatement reused 50 times (prepareThreshold=1)",
            "batch insert of 1000 rows",
            "getBytes/getTimestamp/getBigDecimal round-trip",
            "transaction commit and rollback",
            "SQLException then reuse",
            "DatabaseMetaData catalog queries",
            "fetchSize streaming cursor over 100k rows",
            "cleanup",
        };
        Check[] checks = {
            Jdbc::setup,
            Jdbc::preparedReuse,
            Jdbc::batchInsert,
            Jdbc::typeRoundTrip,
            Jdbc::transactions,
            Jdbc::errorThenReuse,
            Jdbc::metadata,
            Jdbc::streamingCursor,
            Jdbc::cleanup,
        };
        Connection conn;
        try {
            conn = DriverManager.getConnection(url);
        } catch (SQLException e) {
            e.printStackTrace();
            System.err.println("FAIL: connect: " + e);
            System.exit(1);
            return;
        }
        try {
            for (int i = 0; i < checks.length; i++) {
                try {
                    checks[i].run(conn);
                } catch (Exception e) {
                    e.printStackTrace();
                    System.err.println("FAIL: " + names[i] + ": " + e);
                    System.exit(1);
                }
                System.out.println("ok: " + names[i]);
                System.out.flush();
            }
            conn.close();
        } catch (SQLException e) {
            e.printStackTrace();
            System.err.println("FAIL: close: " + e);
            System.exit(1);
        }
        System.out.println("all " + checks.length + " JDBC checks passed");
    }
}
